"""Adaptive K-FAC's building blocks (Martens & Grosse, 2015): output-space loss Hessians and the exact local
quadratic model on the current batch, from which step size, momentum and Levenberg-Marquardt damping follow."""
