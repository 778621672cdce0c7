"""The single-node controller and router (issue: `jmp controller serve`)."""
