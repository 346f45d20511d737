"""The recipe: one typed `Recipe` (pydantic, extra keys refused) and its generated key reference."""
