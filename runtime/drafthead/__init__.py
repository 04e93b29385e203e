"""The draft-head toolchain, apart from the ZeroMQ backend: prompt sets, the target's answers,
training an EAGLE-style head (`flowspec train-draft`) and scoring drafters offline (`flowspec bench
draft`). The runtime itself only loads a trained head (`runtime.eagle`)."""
