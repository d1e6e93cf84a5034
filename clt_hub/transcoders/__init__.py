"""The transcoder module (CLT and PLT in one implementation), its activation functions and its Hub I/O."""
