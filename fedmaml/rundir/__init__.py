"""The run directory: everything a run writes, and the code that writes, locks, reads and reports
it.

Modules: ``names`` (the files, named once), ``recorder`` (the tables written during a run),
``lock`` (one run at a time), ``report`` (reading the tables back, plots and ``summary.md``).
The checkpoint's format is :mod:`fedmaml.checkpoint`; its file name is ``names.CHECKPOINT``.
"""
