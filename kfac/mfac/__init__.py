"""M-FAC: the sliding-window empirical Fisher and the preconditioner built on it.

Layers, bottom up: :mod:`~kfac.mfac.woodbury` (``F^{-1} v = (v - G^T (kλ I + G G^T)^{-1} G v) / λ``: the ``k x k``
Gram factorisation, block layout and the Fishers' base class) -> :mod:`~kfac.mfac.fisher` (the sliding window,
:class:`SlidingWindowFisher`) and :mod:`~kfac.mfac.static` (:class:`StaticFisher`, used by influence) ->
:mod:`~kfac.mfac.blocks` (which parameters form a block; reading and writing ``.grad``) and
:mod:`~kfac.mfac.sharding` (block-to-rank assignment, exchange, state dict) -> :mod:`~kfac.mfac.mfac_preconditioner`
(:class:`kfac.MFACPreconditioner`).
"""
