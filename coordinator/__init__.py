"""swarm-coordinator: schedules a job over the swarm and runs its trainer."""
