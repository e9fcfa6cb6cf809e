"""Commands around the product, not in a daemon's import path: the backtest,
the demo and HAProxy provisioning."""
