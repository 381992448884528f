"""Judges as a shared service (core, not a stage): the OpenAI-compatible endpoint client (``api``), local and
endpoint judges behind one interface with re-asks (``clients``), score parsing (``parse``) and the judge as a
selection utility (``utility``). Stage 05 judges answers with them; stage 02 may select candidates with them."""
