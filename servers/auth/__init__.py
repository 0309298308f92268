"""Wallet sign-in, sessions and API roles (far.auth.v1): EIP-4361 challenges, JWT access tokens, refresh tokens."""
