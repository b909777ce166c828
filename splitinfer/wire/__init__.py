"""What crosses the network: the tensor codec, the wire protocol (messages and errors) and the codec's cost."""
