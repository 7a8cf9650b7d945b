"""Safety: the prompt set and rule scorer (`phi3local safety`), the prepare screen, and the deploy gate.

scorer (rules) <- evaluate (runs models, writes safety.json) ; screen (prepare) ; gate (azure push, no torch);
content_safety (Azure AI Content Safety over REST, optional).
"""
