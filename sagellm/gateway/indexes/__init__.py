"""Retrieval indexes on the gateway (`/admin/index/*`) and chats that answer from one (`routes`)."""
