"""The fuzz benchmark's parts (``bench/fuzz.py`` runs them): the input generator, the in-process
decoder targets and the live-node fuzzer. A package of its own so that ``make bench``, which runs
every ``bench/*.py``, does not run these helpers on their own."""
