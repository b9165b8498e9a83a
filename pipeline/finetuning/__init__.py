"""Fine-tuning library: training.py runs a training stage's work (the dataset mixture, lora / qlora / full / freeze,
trainer arguments, resuming, saving a model folder or an adapter); chat_templates.py names the chat templates and
finds which tokens training learns."""
