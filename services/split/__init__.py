"""The adaptive prefill/decode split on one GPU and SLO-aware admission: the policy (controller.py), what workers
tell each other through Redis (board.py) and how a split is applied on each vendor (mechanism.py)."""
