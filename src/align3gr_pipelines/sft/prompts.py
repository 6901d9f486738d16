"""Prompt templates of the SFT tasks. One place, so SFT, DPO and evaluation build identical prompts.

Every task has several phrasings; an example records which one it used (`template_id`). Fields:
`{user}` the user's SCID tokens (or :data:`NO_USER` when user SCID injection is off or the user has none),
`{history}` item SCID strings joined by ", " (oldest first), `{titles}` item titles joined by "; ",
`{item}` one item SCID, `{item_text}` an item's description line, `{query}` a search intention,
`{profile}` a user's profile text.

Tasks (names are ours; the ablation groups follow the Align3GR paper's tables):

| task              | group | prompt                       | response            |
|-------------------|-------|------------------------------|---------------------|
| `seq`             | SEQ   | user + history SCIDs         | next item SCID      |
| `item_text2scid`  | C1    | item text                    | item SCID           |
| `item_scid2text`  | C1    | item SCID                    | item title          |
| `seq2text`        | C2    | user + history SCIDs         | next item's title   |
| `titles2scid`     | C3    | user + history titles        | next item SCID      |
| `intent_search`   | B1    | user + intention query       | item SCID           |
| `preference`      | B1    | user + history SCIDs         | preference text     |
| `user_text2scid`  | B2    | user profile text            | user SCID           |
| `user_scid2text`  | B2    | user SCID                    | user profile text   |
"""
from __future__ import annotations

from collections.abc import Sequence

# The SEQ phrasings. DPO and evaluation build their prompts through `seq_prompt`, never by hand.
SEQ_TEMPLATES: tuple[str, ...] = (
    "User {user} has interacted with items {history} in order. Predict the next item the user will interact with:",
    "Here is the interaction history of user {user}: {history}. What item comes next?",
    "Given that user {user} engaged with {history}, recommend the next item:",
)
NO_USER = "this user"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "seq": SEQ_TEMPLATES,
    "item_text2scid": (
        "Which item is described as: {item_text}? Answer with its item ID:",
        "Give the item ID of this product: {item_text}.",
        "An item has the following details: {item_text}. What is its index?",
    ),
    "item_scid2text": (
        "What is the title of item {item}?",
        "Item {item} is called:",
        "Name the product with index {item}:",
    ),
    "seq2text": (
        "User {user} has interacted with items {history} in order. What is the title of the next item?",
        "After {history}, which product will user {user} choose next? Give its title:",
        "Predict the name of the item user {user} will pick after {history}:",
    ),
    "titles2scid": (
        "User {user} has bought: {titles}. Which item comes next? Answer with its item ID:",
        "The purchase history of user {user} is {titles}. Recommend the next item's index:",
        "Based on the items {titles}, what item ID will user {user} interact with next?",
    ),
    "intent_search": (
        "User {user} is searching: \"{query}\". Which item fits best?",
        "Find an item for user {user} who wants the following: {query}",
        "User {user} asks: {query}. Recommend an item ID:",
    ),
    "preference": (
        "User {user} has interacted with items {history}. Describe the user's preferences:",
        "What does user {user} like, judging by {history}?",
        "Summarise the taste of user {user} from the history {history}:",
    ),
    "user_text2scid": (
        "Which user ID matches this profile: {profile}?",
        "Give the user index of the person described as: {profile}.",
        "A user is described as follows: {profile}. What is the user's ID?",
    ),
    "user_scid2text": (
        "Describe user {user}:",
        "What do we know about user {user}?",
        "Write the profile of user {user}:",
    ),
}

# Tasks whose response is one item SCID (their examples carry `target_item_id`).
ITEM_RESPONSE_TASKS = frozenset({"seq", "item_text2scid", "titles2scid", "intent_search"})


def n_templates(task: str) -> int:
    if task not in TEMPLATES:
        raise KeyError(f"unknown SFT task {task!r}; known tasks: {sorted(TEMPLATES)}")
    return len(TEMPLATES[task])


def render(task: str, template_id: int, **fields: str) -> str:
    """The prompt of `task` in phrasing `template_id` (taken modulo the number of phrasings)."""
    templates = TEMPLATES.get(task)
    if templates is None:
        raise KeyError(f"unknown SFT task {task!r}; known tasks: {sorted(TEMPLATES)}")
    return templates[template_id % len(templates)].format(**fields)


def user_field(user_tokens: str | None) -> str:
    return user_tokens or NO_USER


def seq_prompt(history_tokens: Sequence[str], user_tokens: str | None, template_id: int = 0) -> str:
    """The SEQ prompt for a history of item SCID strings (oldest first) and the user's SCID (or None)."""
    return render("seq", template_id, history=", ".join(history_tokens), user=user_field(user_tokens))
