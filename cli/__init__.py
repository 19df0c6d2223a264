"""The ``zkd`` command line: thin click wrappers over :mod:`zeroshot_kd`."""
