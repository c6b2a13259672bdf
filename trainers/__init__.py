"""The compact training loop, its checkpoints and losses (EWC), and run set-up."""
