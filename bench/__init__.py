"""fastfib's benchmark suite: ``python -m bench`` (see ``docs/benchmarks.md``).

- :mod:`bench.harness`: starts the servers and the load processes, runs the grid;
- :mod:`bench.servers`: the reference servers (naive tutorial, gmpy2 single-process, echo);
- :mod:`bench.load`: the load-generator processes (pika, Direct Reply-to, every reply verified);
- :mod:`bench.report` and :mod:`bench.plots`: report.json, report.md, the rich table, the PNGs;
- ``bench/test_kernel.py``: the kernel micro-benchmarks, ``python -m bench kernel``.
"""
