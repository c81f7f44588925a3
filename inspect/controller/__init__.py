"""The line controller: verdicts become cell and lot decisions, stored, audited and reviewed."""
