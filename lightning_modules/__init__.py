"""One LightningModule per stage (and baselines/); they orchestrate, models/ computes."""
