"""Training of Helios stages 1-2: sample construction, corruption, losses, LoRA, the loop."""
