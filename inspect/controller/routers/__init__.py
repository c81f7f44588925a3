"""One router per resource (lots, cells, alarms, admin, session, system)."""
