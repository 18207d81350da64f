"""Cache methods behind one protocol (see base.py); one file per method."""
