"""dergw gateway: the per-site process that owns the site's safety (control, outbox, uplink)."""
