"""Prompt and preference datasets, read from local files with HF `datasets`."""

from rlaif_recipes.data.harm_requests import harm_requests
from rlaif_recipes.data.people_labels import labelled_responses, review_answers
from rlaif_recipes.data.preferences import preference_dataset, tokenize_preferences
from rlaif_recipes.data.prompts import is_held_out, prompt_dataset, prompt_mixture
from rlaif_recipes.data.reviewed_pairs import reviewed_pairs
from rlaif_recipes.data.xstest_pairs import xstest_pairs

__all__ = ["harm_requests", "preference_dataset", "tokenize_preferences", "is_held_out", "labelled_responses", "prompt_dataset", "prompt_mixture", "review_answers", "reviewed_pairs", "xstest_pairs"]
