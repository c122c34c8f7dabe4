"""MIS-FM demo package: data fetching, pretraining and fine-tuning jobs for the MONAI port of MIS-FM."""
