"""``stream-lstm bench``: one module per benchmark, each figure against a baseline of the same run.

``cli.py`` runs them all (``IN_PROCESS``, then with a broker ``BENCHMARKS``) and prints one
JSON object last; ``core.py`` holds the first ones (the engine, the in-process pipeline at
scale, a plain consume loop against the worker) and what the Kafka ones share (``prefill``,
``Record``); ``fixture.py`` what the in-process ones share. Then ``eos``, ``relay``, ``live``,
``restore``, ``retrain``, ``experts``, ``alerts``, ``backlog``, ``latency`` and ``processes``:
each module's docstring says what it measures.
"""
