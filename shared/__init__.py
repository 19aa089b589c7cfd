"""What daemon and client agree on: errors, options, protocol, settings. No torch here."""
