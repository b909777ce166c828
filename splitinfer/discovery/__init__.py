"""Finding peers: advertise and browse cloud workers and edge agents (zeroconf / mDNS)."""
