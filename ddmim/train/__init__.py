"""Running a fit: the shared run flow, the Lightning modules of pretraining and fine-tuning, the trainer."""
