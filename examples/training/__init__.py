"""What the torchrun ResNet examples share: flags (``options``), distributed set-up (``env``), data sharding and
seeded augmentation (``data``), optimizer and LR schedule construction (``optim``), checkpointing (``checkpoint``),
TensorBoard logging (``tblog``) and the train/eval loop (``loop``). The scripts (``torch_cifar10_resnet.py``,
``torch_imagenet_resnet.py``) only add their data sets, models and default hyperparameters.

Conventions (one place for each):

* ``--batch-size`` is the *global* batch: each of the ``N`` processes gets ``batch_size / N`` examples per step.
  Together with :class:`EpochSampler` (a ``DistributedSampler`` with ``drop_last``) the examples of global step
  ``k`` of an epoch are positions ``[k B, (k + 1) B)`` of that epoch's permutation whatever ``N`` is, so the number
  of steps per epoch, the data of every step and the LR schedule do not depend on the number of processes, and a
  checkpoint resumes at any ``--nproc_per_node`` (K-FAC's and M-FAC's state load at any world size too).
* Data augmentation is seeded per example by ``(seed, epoch, index)`` (:class:`SeededDataset`), so it depends
  neither on the number of processes nor on the number of loader workers nor on where a run was resumed.
* The LR schedule is per optimizer step: linear warm-up over ``--warmup-epochs``, then ``cosine``, ``multistep``
  (``--lr-milestones`` epochs, ``--lr-decay``) or ``constant``, over ``--epochs`` epochs. ``--max-steps`` only
  stops the run early; it does not change the schedule (so a run stopped and restarted with a larger
  ``--max-steps`` is the same as one uninterrupted run).
* A checkpoint (``checkpoint-<step>.pt`` in ``--checkpoint-dir``) holds the model, the optimizer (K-FAC/M-FAC state
  included), the LR scheduler, the AMP grad scaler, the step and every rank's RNG states; it is written by rank 0
  to a temporary file and renamed (atomic), at the end of every epoch, every ``--checkpoint-every`` steps and at
  the end of the run. At start the latest one is loaded if present. Every rank reads it: in a multi-node job the
  directory must be on a shared file system.
"""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # run from a checkout without installing: kfac
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
