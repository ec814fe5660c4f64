# Writes dmakit.pc at install time (see cmake/install.cmake), for the prefix
# being installed to. Inputs: DMAKIT_PC_TEMPLATE, DMAKIT_PC_OUTPUT,
# DMAKIT_PC_LIBDIR, DMAKIT_PC_INCLUDEDIR, DMAKIT_PC_VERSION, DMAKIT_PC_LIBS_PRIVATE.
set(DMAKIT_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
foreach(dir LIBDIR INCLUDEDIR)
  if(NOT IS_ABSOLUTE "${DMAKIT_PC_${dir}}")
    set(DMAKIT_PC_${dir} "\${prefix}/${DMAKIT_PC_${dir}}")
  endif()
endforeach()
configure_file("${DMAKIT_PC_TEMPLATE}" "${DMAKIT_PC_OUTPUT}" @ONLY)
