# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# The core (_core.pyx and the kernels/ files it includes) compiled for x86-64-v3:
# setup.py builds it with -march=x86-64-v3, and femtogpt/_dispatch.py loads it
# on a CPU that runs it.
include "_core.pyx"
