"""The one terminal console every stage writes progress and messages to (stderr, never wrapped mid-message)."""

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
