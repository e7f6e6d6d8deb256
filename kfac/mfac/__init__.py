"""M-FAC: the sliding-window empirical Fisher and the preconditioner built on it."""
