"""Distribution: the communicator (the only code that calls ``torch.distributed``), the bucketed factor reduction
and the executor that carries out a :class:`kfac.planner.Plan`."""
