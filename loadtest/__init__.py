"""Load generator and side-by-side benchmarks for the exitserve HTTP API.

``python -m loadtest --help`` lists the commands: ``run`` (one bounded run against a loopback URL),
``bench`` (the standard set behind ``make bench`` and BENCHMARKS.md), ``make-tiny`` (a 1-layer random
model store for measuring the front end's own ceiling) and ``report`` (re-draw plots and tables).
"""
