"""Judges as a shared service (core, not a stage): the OpenAI-compatible endpoint client (``api``), local and
endpoint judges behind one interface with re-asks (``clients``) and score parsing (``parse``). Stage 05 judges answers
with them; stage 02's judge utility (selftrain/select/judge_utility.py) selects candidates with them."""
