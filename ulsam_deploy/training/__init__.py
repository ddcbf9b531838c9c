"""Training: the loop, its data pipeline, distributed launch, resume and distillation."""
