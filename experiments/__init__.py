"""Experiment tooling that studies the product: sweeps of `flwr run` simulations, reports, benchmarks, the
privacy audit and its independent re-derivation, and the scripts behind docs/RESULTS.md.

The product (dplora/, server_app/, client_app/) is what runs in a federation and never imports this package;
each module here is run from the command line through its thin entry point, scripts/<name>.py.
"""
