"""The DIMSE front door (issue 8): a pynetdicom Application Entity over the same ingest, index
and blob store as DICOMweb. Verification, Storage, and Query/Retrieve (Patient and Study Root:
C-FIND, C-MOVE, C-GET) SCP. The only importer of pynetdicom.

Submodules (import from the one that defines a name; nothing is re-exported here):

    identifier.py   C-FIND / C-MOVE / C-GET identifiers <-> query.Query (pure)
    peers.py        C-MOVE destinations from a JSON file
    handlers.py     the event handlers, bridged onto the server's event loop
    statuses.py     the C-STORE/C-FIND/C-MOVE/C-GET statuses answered or audited, status()
                    data sets
    conversion.py   C-MOVE/C-GET sub-operations: contexts proposed, syntax sent in, decode
    sending.py      C-MOVE/C-GET sub-operations in bounded memory: stored files sent a PDU at
                    a time, the PDUs queued for the peer bounded
    association.py  TCP_NODELAY, spool files of C-STOREs an association left unserved, the
                    final C-GET/C-MOVE responses
    stores.py       C-STOREs refused before the ingest (another SOP Class than their
                    context's, no data set, one that never comes)
    release.py      an A-RELEASE-RQ while C-GET/C-MOVE sub-operations are under way
    connections.py  each connection: the data set size limit, and the audit events of an
                    association refused or ended without release, and of its unserved C-STOREs
    retrieval.py    one C-MOVE/C-GET's sub-operation outcomes and final status (audit)
    server.py       the AE: contexts, limits, start and stop
"""
