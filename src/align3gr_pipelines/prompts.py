"""Prompt templates of the SFT tasks. One place, so SFT, DPO and evaluation build identical prompts.

The sft_data stage owns the full set of tasks; the SEQ builder below is what DPO and evaluation call.
"""
from __future__ import annotations

from collections.abc import Sequence

# Several phrasings of sequential item prediction (SEQ); `{history}` holds the item SCID strings and
# `{user}` the user's SCID (or a neutral word when user SCID injection is off).
SEQ_TEMPLATES: tuple[str, ...] = (
    "User {user} has interacted with items {history} in order. Predict the next item the user will interact with:",
    "Here is the interaction history of user {user}: {history}. What item comes next?",
    "Given that user {user} engaged with {history}, recommend the next item:",
)
NO_USER = "this user"


def seq_prompt(history_tokens: Sequence[str], user_tokens: str | None, template_id: int = 0) -> str:
    """The SEQ prompt for a history of item SCID strings (oldest first) and the user's SCID (or None)."""
    template = SEQ_TEMPLATES[template_id % len(SEQ_TEMPLATES)]
    return template.format(history=", ".join(history_tokens), user=user_tokens or NO_USER)
