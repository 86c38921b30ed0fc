"""tests/conformance: holds MoE-MT to test suites other projects wrote.

`test_transformers_common.py` is a model tester for transformers' own test tree (relative imports into it): it runs
only through `test_peer_suite.py`, never collected directly.
"""

collect_ignore = ["test_transformers_common.py"]
