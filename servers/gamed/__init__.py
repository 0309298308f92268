"""The game distribution catalog (far.gamed.v1): games, builds, channels, releases, download links."""
