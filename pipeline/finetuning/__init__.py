"""Fine-tuning library: training a model on canonical datasets, and the chat templates it trains with."""
