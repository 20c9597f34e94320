"""Coverage-guided fuzzing of the codec and the sans-I/O sessions (atheris), outside CI;
see ``fuzz/README.md``. ``tests/test_fuzz_corpus.py`` replays the corpus in CI."""
