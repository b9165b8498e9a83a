"""Evaluation library: stats.py (paired tests, bootstrap CIs, Holm), plots.py (report and data charts),
chat_app.py (the Gradio app to try models by hand, side by side)."""
