"""Kronecker-factored curvature (K-FAC, EK-FAC): statistics hooks, the factor store, the curvature methods and the
preconditioner that orchestrates them."""
