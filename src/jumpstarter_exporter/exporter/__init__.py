"""The exporter daemon (``jmp run``): lifecycle, controller link, lease sessions, sd_notify."""
