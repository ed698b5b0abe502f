from webproxy.cli import main

raise SystemExit(main())
