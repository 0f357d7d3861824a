"""Triton kernels of the fused ops. Importing a module here imports ``triton``; the public ops in
:mod:`due_ext.ops` import these lazily, only when the ``triton`` backend is chosen."""
