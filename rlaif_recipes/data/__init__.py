"""Prompt and preference datasets, read from local files with HF `datasets`."""

from rlaif_recipes.data.prompts import is_held_out, prompt_dataset

__all__ = ["is_held_out", "prompt_dataset"]
